"""The Hub: `client` builds the one huggingface_hub client; `server` is the local, file-backed Hub stand-in that
the demo, the tests and the benchmarks run against."""
