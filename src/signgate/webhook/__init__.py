"""The admission webhook: Kubernetes asks before it admits a workload, signgate answers.

``review`` parses AdmissionReview v1 requests and finds the images of each workload kind (pure);
``decision`` turns a request, the policy and the verdicts of the images into the answer (pure).
The ASGI server and the offline ``signgate check`` both call these two; the registry work
between them (resolving tags, verifying signatures, caching verdicts) is the caller's.
"""
