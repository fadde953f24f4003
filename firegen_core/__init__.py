"""What the worker and the Cloud Functions share: the request contract, the error types, the job state machine,
the per-user limits and the Firestore job store. No torch, no RunPod: `functions/` ships this package whole
(see the README)."""
