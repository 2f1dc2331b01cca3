"""The Open Inference Protocol (KServe V2 / Triton), spoken over REST (service/routes/v2.py with
rest.py) and gRPC (grpc_server.py), both through one protocol core (core.py) and the worker's
data plane (service/dataplane.py).

- core.py: tensors and requested outputs, independent of the transport → an InferenceRequest;
  the result → output tensors (FP32, BYTES, BOOL); model metadata; the protocol's error.
- rest.py: the JSON messages and the binary tensor data extension (inputs and outputs).
- grpc_server.py: `inference.GRPCInferenceService` (grpc_predict_v2.proto, generated modules
  beside it) on a grpc.aio server in each worker.
"""
