"""Triton adapter of the voice encoder: parse the AUDIO bytes -> ``VoiceEncoder.encode``
-> PROMPT_TOKENS, PROMPT_MEL, SPEAKER_EMBEDDING. Bad clips (not audio, under 1 s,
silent) fail alone with "INVALID_ARGUMENT: ..." / "UNSUPPORTED_MEDIA: ..."."""
import triton_python_backend_utils as pb_utils

from stepaudio2.runtime.triton_params import (get_param, model_parameters, parse_voice_request, request_inputs,
                                              triton_error)



class TritonPythonModel:
    def initialize(self, args):
        from stepaudio2.model.token2wav.features import VoiceEncoder

        params = model_parameters(args["model_config"])
        self.encoder = VoiceEncoder.from_pretrained(get_param(params, "model_dir"),
                                                    num_threads=get_param(params, "num_threads", int, None,
                                                                          minimum=1))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                voice = self.encoder.encode(parse_voice_request(request_inputs(pb_utils, request, ("AUDIO",))),
                                            voice_id="unnamed")
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("PROMPT_TOKENS", voice.prompt_tokens),
                    pb_utils.Tensor("PROMPT_MEL", voice.prompt_mel),
                    pb_utils.Tensor("SPEAKER_EMBEDDING", voice.speaker_embedding),
                ]))
            except Exception as e:  # noqa: BLE001 - this request fails alone
                responses.append(pb_utils.InferenceResponse(error=triton_error(pb_utils, e, request.request_id())))
        return responses
