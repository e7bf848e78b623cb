"""The gateway's response formats (SRT, WebVTT, OpenAI JSON shapes) and error relay,
without a network: pure functions of ``stepaudio2.gateway.serving``."""
import grpc
import pytest

from stepaudio2.gateway.protocol import TranscriptionRequest
from stepaudio2.gateway.serving import (
    ApiError,
    CallContext,
    error_from_rpc,
    format_timestamp,
    render_transcription,
    to_srt,
    to_vtt,
)
from stepaudio2.runtime.errors import InvalidArgument
from stepaudio2.v1 import assistant_pb2


def _segments(*items):
    return [assistant_pb2.Segment(index=i, start_s=s, end_s=e, text=t, tokens=3) for i, (s, e, t) in enumerate(items)]


def _response(*items, duration=30.5):
    segs = _segments(*items)
    return assistant_pb2.TranscribeResponse(text=" ".join(s.text for s in segs), segments=segs, duration_s=duration,
                                            model="tiny")


@pytest.mark.parametrize("seconds, marker, expected", [
    (0.0, ",", "00:00:00,000"),
    (1.5, ",", "00:00:01,500"),
    (61.001, ".", "00:01:01.001"),
    (3599.9996, ".", "01:00:00.000"),      # rounds to the nearest millisecond, carrying
    (3 * 3600 + 25 * 60 + 7.25, ",", "03:25:07,250"),
    (100 * 3600, ".", "100:00:00.000"),    # hours are not wrapped at 99
    (-0.2, ",", "00:00:00,000"),           # never negative
])
def test_format_timestamp(seconds, marker, expected):
    assert format_timestamp(seconds, decimal_marker=marker) == expected


def test_srt_numbers_cues_from_one_with_comma_milliseconds():
    srt = to_srt(_segments((0.0, 2.5, "three one four"), (2.5, 25.0, " one five nine ")))
    assert srt == ("1\n00:00:00,000 --> 00:00:02,500\nthree one four\n\n"
                   "2\n00:00:02,500 --> 00:00:25,000\none five nine\n")


def test_vtt_has_header_and_dot_milliseconds():
    vtt = to_vtt(_segments((0.0, 2.5, "three one four"), (25.0, 30.25, "two six")))
    assert vtt == ("WEBVTT\n\n00:00:00.000 --> 00:00:02.500\nthree one four\n\n"
                   "00:00:25.000 --> 00:00:30.250\ntwo six\n")


def test_cue_text_cannot_break_the_format():
    # A blank line would end the cue early and "-->" would read as a timing line.
    segs = _segments((0.0, 1.0, "a\n\n\nb --> c"), (1.0, 2.0, "   "), (2.0, 1.5, "d"))
    srt = to_srt(segs)
    assert srt == "1\n00:00:00,000 --> 00:00:01,000\na\nb -> c\n\n2\n00:00:02,000 --> 00:00:02,000\nd\n"
    assert "\n\n\n" not in to_vtt(segs) and to_vtt(segs).count("-->") == 2


def test_empty_transcript_formats():
    assert to_srt([]) == ""
    assert to_vtt([]) == "WEBVTT\n\n"


def test_render_every_response_format():
    resp = _response((0.0, 25.0, "three one four"), (25.0, 30.5, "one five"))
    req = TranscriptionRequest.from_form({"response_format": "json"})
    assert render_transcription(req, resp).model_dump() == {
        "text": "three one four one five", "usage": {"type": "duration", "seconds": 30.5}}
    assert render_transcription(TranscriptionRequest.from_form({"response_format": "text"}), resp) == \
        "three one four one five"
    assert render_transcription(TranscriptionRequest.from_form({"response_format": "srt"}), resp).startswith("1\n")
    assert render_transcription(TranscriptionRequest.from_form({"response_format": "vtt"}), resp).startswith("WEBVTT")
    verbose = render_transcription(
        TranscriptionRequest.from_form({"response_format": "verbose_json", "language": "en", "temperature": "0.2"}),
        resp).model_dump()
    assert verbose["task"] == "transcribe" and verbose["language"] == "en" and verbose["duration"] == 30.5
    assert [(s["id"], s["start"], s["end"], s["text"], s["seek"]) for s in verbose["segments"]] == [
        (0, 0.0, 25.0, "three one four", 0), (1, 25.0, 30.5, "one five", 2500)]
    assert verbose["segments"][0]["temperature"] == 0.2
    no_hint = render_transcription(TranscriptionRequest.from_form({"response_format": "verbose_json"}), resp)
    assert no_hint.language == "und"


@pytest.mark.parametrize("fields, param", [
    ({"response_format": "xml"}, "response_format"),
    ({"temperature": "1.5"}, "temperature"),
    ({"temperature": "warm"}, "temperature"),
    ({"stream": "true"}, "stream"),
])
def test_request_validation_names_the_field(fields, param):
    with pytest.raises(InvalidArgument) as info:
        TranscriptionRequest.from_form(fields)
    assert info.value.field == param


def test_request_defaults_and_ignored_fields():
    req = TranscriptionRequest.from_form({"model": "m", "temperature": "", "timestamp_granularities[]": "segment"})
    assert (req.model, req.response_format, req.temperature, req.stream) == ("m", "json", 0.0, False)


def _rpc_error(code, details="", trailing=()):
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details)


def test_error_relay_uses_error_info_reason_and_field():
    from stepaudio2.runtime.grpc_errors import rich_status

    st = rich_status(grpc.StatusCode.INVALID_ARGUMENT, "UNSUPPORTED_MEDIA", "not audio", field="audio.data")
    err = error_from_rpc(_rpc_error(st.code, st.details, st.trailing_metadata), "orch:1")
    # gRPC's field names are reported as the HTTP form's: the audio is `file`.
    assert (err.code, err.reason, err.field, err.mapping.http) == ("UNSUPPORTED_MEDIA", "not audio", "file", 415)
    st = rich_status(grpc.StatusCode.NOT_FOUND, "NOT_FOUND", "model: 'x' is not served", field="model")
    err = error_from_rpc(_rpc_error(st.code, st.details, st.trailing_metadata), "orch:1")
    assert (err.reason, err.field, err.mapping.http) == ("'x' is not served", "model", 404)


def test_error_relay_without_details():
    err = error_from_rpc(_rpc_error(grpc.StatusCode.UNAVAILABLE, "failed to connect"), "127.0.0.1:9")
    assert err.code == "UNAVAILABLE" and "127.0.0.1:9 is unreachable" in err.reason and err.mapping.http == 503
    assert error_from_rpc(_rpc_error(grpc.StatusCode.NOT_FOUND, "no such model"), "x").mapping.http == 404
    assert error_from_rpc(_rpc_error(grpc.StatusCode.UNKNOWN, "boom"), "x").code == "INTERNAL"
    assert ApiError("NO_SUCH_CODE", "x").code == "INTERNAL"


def test_call_metadata_forwards_key_and_request_id():
    assert CallContext(request_id="r1", api_key="k").metadata() == (("x-request-id", "r1"),
                                                                     ("authorization", "Bearer k"))
    assert CallContext(request_id="r2").metadata() == (("x-request-id", "r2"),)
