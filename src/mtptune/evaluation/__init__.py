"""Acceptance measured the way serving sees it: teacher-forced (`offline`), real speculative decoding
(`speculative`), and a live vLLM's Prometheus counters (`vllm_metrics`); `report` writes and compares results."""
