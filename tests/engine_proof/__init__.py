"""Proof of engine behaviour with the engines' own code (SGLang 0.5.23, vLLM 0.33.0) on the PEFT fixtures.

See common.py for the record each engine harness returns and how it is compared with PEFT's reference.
"""
