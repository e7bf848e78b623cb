"""Triton adapter of the Step-Audio 2 LLM (decoupled, streaming): parse tensors -> submit
to ONE continuous-batching ``LLMEngine`` -> stream token ids back (practice 1).

Every request ends with exactly one response flagged COMPLETE_FINAL, on every path
(practice 4): finished (TOKEN_IDS + FINISH_REASON stop|length), cancelled, failed, or
refused at submit. Errors carry a stable "<CODE>: " message prefix (INVALID_ARGUMENT,
RESOURCE_EXHAUSTED, CANCELLED, INTERNAL) because an error inside a gRPC stream reaches
the client as text only.
"""
import itertools

import numpy as np
import triton_python_backend_utils as pb_utils

from stepaudio2.runtime.triton_params import (SAMPLING_INPUTS, engine_stats, EngineMetrics, get_param,
                                              load_serving_model, model_parameters, parse_llm_request, request_inputs,
                                              RequestCancelled, split_audio_embeds, triton_error)

INPUTS = ("INPUT_IDS", "AUDIO_EMBEDS", "STOP_IDS", "ALLOWED_TOKEN_IDS", "LOGIT_BIAS_IDS", "LOGIT_BIAS_VALUES",
          *SAMPLING_INPUTS)
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL



class _Stream:
    """The engine's on_output callback for one request: EngineOutput -> responses."""

    def __init__(self, sender, request_id, metrics):
        self.sender = sender
        self.request_id = request_id   # the client's id, named in error messages
        self.metrics = metrics

    def __call__(self, out):
        # Metrics first: once the final response is out the model may be unloaded.
        self.metrics.maybe_publish(force=out.finished)
        if not out.finished:
            # May raise when the client is gone: the engine then cancels the request.
            self.sender.send(self._tokens(out.token_ids, ""))
            return
        if out.finish_reason in ("stop", "length"):
            response = self._tokens(out.token_ids, out.finish_reason)
        else:  # "cancelled" or "error": still the FINAL flag, so the stream closes
            err = out.error or RequestCancelled("the request was cancelled before it finished")
            response = pb_utils.InferenceResponse(error=triton_error(pb_utils, err, self.request_id))
        try:
            self.sender.send(response, flags=FINAL)
        except Exception as e:  # noqa: BLE001 - e.g. the client cancelled and left
            pb_utils.Logger.log_info(f"llm: final response not delivered ({out.finish_reason}): {e!r}")

    @staticmethod
    def _tokens(ids, reason):
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("TOKEN_IDS", np.asarray(ids, dtype=np.int32)),
            pb_utils.Tensor("FINISH_REASON", np.array([reason.encode()], dtype=np.object_)),
        ])


class TritonPythonModel:
    def initialize(self, args):
        from stepaudio2.model.engine import LLMEngine
        params = model_parameters(args["model_config"])
        self.model = load_serving_model(args, params)
        self.llm_dim = self.model.config.text.hidden_size
        self.patch_id = self.model.tokenizer.special.audio_patch
        self.engine = LLMEngine(self.model,
                                max_batch=get_param(params, "max_batch", int, minimum=1),
                                max_queue=get_param(params, "max_queue", int, minimum=1),
                                prefill_budget=get_param(params, "prefill_budget", int, None, minimum=1),
                                capacity=get_param(params, "kv_capacity", int, 256, minimum=1),
                                max_len=get_param(params, "max_len", int, None, minimum=1),
                                deliver_in_thread=True,
                                stream_interval_s=get_param(params, "stream_interval_ms", float, 0.0,
                                                            minimum=0) / 1000).start()
        self.metrics = EngineMetrics(pb_utils, lambda: engine_stats(self.engine),
                                     {"model": args["model_name"], "version": args["model_version"]},
                                     get_param(params, "metrics_interval_ms", int, 200, minimum=1) / 1000)
        self.metrics.publish()
        self._seq = itertools.count()

    def execute(self, requests):
        from stepaudio2.model.modeling import patch_runs
        from stepaudio2.model.sampling import SamplingParams

        for request in requests:
            sender = request.get_response_sender()
            client_id = request.request_id()
            # Engine ids must be unique among active requests; client ids need not be.
            rid = f"{client_id or 'req'}#{next(self._seq)}"
            try:
                req = parse_llm_request(request_inputs(pb_utils, request, INPUTS), self.llm_dim)
                audio = split_audio_embeds(req.audio_embeds, patch_runs(req.input_ids, self.patch_id))
                self.engine.submit(rid, req.input_ids, audio, SamplingParams(**req.sampling),
                                   on_output=_Stream(sender, client_id, self.metrics), is_cancelled=sender.is_cancelled)
            except Exception as e:  # noqa: BLE001 - refused at submit: error + FINAL, nothing queued
                self.metrics.maybe_publish(force=True)
                sender.send(pb_utils.InferenceResponse(error=triton_error(pb_utils, e, client_id)), flags=FINAL)
        self.metrics.maybe_publish()
        return None

    def finalize(self):
        # Triton unloads a decoupled model only once its streams are done, so normally
        # nothing is running here; whatever is still unfinished gets its FINAL
        # (cancelled) response from engine.stop(). Metrics go quiet first: an update in
        # flight while the server tears the stub down never returns.
        self.metrics.close()
        self.engine.stop()
