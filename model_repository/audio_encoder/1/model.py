"""Triton adapter of the Step-Audio 2 audio encoder: parse tensors -> one batched
encoder call (``stepaudio2``) -> pack tensors. No model logic here (practice 1).

Contract (config.pbtxt): per request exactly one of WAVEFORM [N] (16 kHz, <= 30 s) or
MEL [128, F]; outputs EMBEDS [N_out, llm_dim] and EMBED_LEN [1]. ``execute`` returns
exactly one response per request; a bad request gets its own error response
("INVALID_ARGUMENT: ...") while the others in the batch still succeed.
"""
import numpy as np
import triton_python_backend_utils as pb_utils

from stepaudio2.runtime.errors import StepAudio2Error
from stepaudio2.runtime.triton_params import (encode_audio_inputs, load_serving_model, model_parameters,
                                              parse_audio_input, request_inputs, triton_error)


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args["model_config"])
        self.model = load_serving_model(args, params)

    def execute(self, requests):
        responses = [None] * len(requests)
        good = []
        for i, request in enumerate(requests):
            try:
                good.append((i, parse_audio_input(*request_inputs(pb_utils, request, ("WAVEFORM", "MEL")).values())))
            except StepAudio2Error as e:
                responses[i] = pb_utils.InferenceResponse(error=triton_error(pb_utils, e))
        if good:
            try:
                embeds = encode_audio_inputs(self.model, [a for _, a in good])
            except Exception as e:  # noqa: BLE001 - the whole batch failed: every request hears why
                pb_utils.Logger.log_error(f"audio_encoder: batch of {len(good)} failed: {e!r}")
                embeds = [e] * len(good)
            for (i, _), emb in zip(good, embeds):
                if isinstance(emb, Exception):
                    responses[i] = pb_utils.InferenceResponse(error=triton_error(pb_utils, emb))
                    continue
                responses[i] = pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("EMBEDS", emb[None]),
                    pb_utils.Tensor("EMBED_LEN", np.array([[emb.shape[0]]], dtype=np.int32)),
                ])
        return responses
