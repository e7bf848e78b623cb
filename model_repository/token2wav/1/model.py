"""Triton adapter of token2wav (sequence batching, ``oldest``): parse each chunk request ->
ONE ``Token2WavService.execute`` over all of them -> one AUDIO response per request.

Stream state (flow + vocoder caches) lives in the service's bounded table, keyed by
Triton's correlation id; a sweeper thread frees streams idle past the sequence idle
timeout (it touches only the table, never the Triton API). Errors carry the stable
"<CODE>: " prefix (NOT_FOUND for an unknown voice, FAILED_PRECONDITION for a chunk of a
stream that is not open, INVALID_ARGUMENT, RESOURCE_EXHAUSTED).
"""
import json

import triton_python_backend_utils as pb_utils

from stepaudio2.runtime.triton_params import (EngineMetrics, get_param, model_device, model_parameters,
                                              parse_t2w_request, request_inputs, triton_error)



T2W_INPUTS = ("TOKENS", "START", "END", "CORRID", "VOICE", "SEED", "CANCEL")


class Token2WavMetrics(EngineMetrics):
    GAUGES = {
        "live": ("stepaudio2_token2wav_live_streams", "token2wav streams holding state now"),
        "max_live": ("stepaudio2_token2wav_max_live_streams", "The most token2wav streams held at once"),
    }
    COUNTERS = {
        "started": ("stepaudio2_token2wav_started_streams_total", "token2wav streams opened"),
        "finished": ("stepaudio2_token2wav_finished_streams_total", "token2wav streams ended by their last chunk"),
        "cancelled": ("stepaudio2_token2wav_cancelled_streams_total", "token2wav streams cancelled or failed"),
        "expired": ("stepaudio2_token2wav_expired_streams_total", "token2wav streams freed after the idle timeout"),
        "refused": ("stepaudio2_token2wav_refused_streams_total", "token2wav streams refused: table full"),
    }


class TritonPythonModel:
    def initialize(self, args):
        import torch

        from stepaudio2.model.token2wav import Token2Wav
        from stepaudio2.model.token2wav.serving import Token2WavService
        from stepaudio2.runtime.state_table import Sweeper
        from stepaudio2.runtime.voice_store import VoiceStoreSettings, ensure_builtin_voices, open_voice_store

        config = json.loads(args["model_config"])
        params = model_parameters(config)
        threads = get_param(params, "num_threads", int, None, minimum=1)
        if threads:
            torch.set_num_threads(threads)
        model_dir = get_param(params, "model_dir")
        self.t2w = Token2Wav.from_pretrained(model_dir, device=model_device(args))
        seed = get_param(params, "noise_seed", int, None, minimum=0)
        if seed is not None:
            self.t2w.reseed_noise(seed)
        overrides = {"cache_items": get_param(params, "voice_cache_items", int, 64, minimum=0)}
        voices_dir = get_param(params, "voices_dir", str, None)
        if voices_dir:
            overrides["local_folder"] = voices_dir
        self.voices = open_voice_store(VoiceStoreSettings(**overrides))
        if get_param(params, "builtin_voices", bool, True):
            from stepaudio2.model.token2wav.features import VoiceEncoder
            from stepaudio2.runtime.errors import CheckpointError

            try:
                added = ensure_builtin_voices(self.voices, VoiceEncoder.from_pretrained(model_dir))
            except CheckpointError as e:       # no ONNX models: only voices registered elsewhere
                pb_utils.Logger.log_warn(f"token2wav: built-in voices not registered: {e}")
                added = []
            if added:
                pb_utils.Logger.log_info(f"token2wav: registered built-in voices {added}")
        seq = config.get("sequence_batching") or {}
        idle_s = int(seq.get("max_sequence_idle_microseconds") or 60_000_000) / 1e6
        # Triton keeps at most max_candidate_sequences streams open; the table allows a few
        # more so that a stream Triton has just expired (its clock runs a little ahead of
        # ours) never blocks the next one while our sweeper has not yet caught up.
        max_streams = int((seq.get("oldest") or {}).get("max_candidate_sequences") or 64) + \
            max(1, int(config.get("max_batch_size") or 1))
        # Triton releases a sequence slot after idle_s; the model frees its state at the same age.
        self.service = Token2WavService(self.t2w, self.voices, max_streams=max_streams, idle_timeout_s=idle_s,
                                        prompt_cache_items=get_param(params, "prompt_cache_items", int, 4,
                                                                     minimum=0))
        from stepaudio2.runtime.voice_store import BUILTIN_VOICES

        warmed = self.service.warm(v for v in BUILTIN_VOICES if self.voices.exists(v))
        if warmed:
            pb_utils.Logger.log_info(f"token2wav: prompt prefill ready for {warmed}")
        self.sweeper = Sweeper(self.service.table, min(1.0, idle_s / 4)).start()
        self.metrics = Token2WavMetrics(pb_utils, self.service.stats,
                                        {"model": args["model_name"], "version": args["model_version"]},
                                        get_param(params, "metrics_interval_ms", int, 200, minimum=1) / 1000)
        self.metrics.publish()

    def execute(self, requests):
        responses = [None] * len(requests)
        chunks, where = [], []
        for i, request in enumerate(requests):
            try:
                chunks.append(parse_t2w_request(request_inputs(pb_utils, request, T2W_INPUTS), request.correlation_id()))
                where.append(i)
            except Exception as e:  # noqa: BLE001
                responses[i] = pb_utils.InferenceResponse(error=triton_error(pb_utils, e, request.request_id()))
        if chunks:
            for i, out in zip(where, self.service.execute(chunks)):
                if isinstance(out, Exception):
                    responses[i] = pb_utils.InferenceResponse(
                        error=triton_error(pb_utils, out, requests[i].request_id()))
                else:
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("AUDIO", out[None])])
        # Published after the work, before the responses leave: a client that got its
        # response sees counters that include it.
        self.metrics.maybe_publish(force=any(c.end or c.cancel or c.start for c in chunks))
        return responses

    def finalize(self):
        self.metrics.close()
        self.sweeper.close()
        self.service.close()
