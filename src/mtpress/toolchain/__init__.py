from mtpress.toolchain.llama_cpp import LLAMA_CPP_VERSION, LlamaCpp, resolve_toolchain, run_tool

__all__ = ["LLAMA_CPP_VERSION", "LlamaCpp", "resolve_toolchain", "run_tool"]
