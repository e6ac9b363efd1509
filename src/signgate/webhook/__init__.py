"""The admission webhook: Kubernetes asks before it admits a workload, signgate answers.

``review`` parses AdmissionReview v1 requests and finds the images of each workload kind (pure);
``decision`` turns a request, the policy and the verdicts of the images into the answer (pure).
``controller`` does the registry work between them (resolving tags, verifying signatures,
caching verdicts, under a deadline) and is shared by the server and the offline
``signgate check``; ``app`` is the ASGI application, ``server`` runs it on uvicorn with TLS
reload, and ``metrics`` holds the Prometheus counters.
"""
