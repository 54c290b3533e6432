"""jaxstar: STaR and Quiet-STaR in JAX/Flax.

Install for development with `pip install -e .[test]` (the Makefile's `.venv` target does this).
"""
import setuptools

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "ml-collections==1.1.0",
    "sentencepiece==0.2.3",
    "mistral-common==1.13.1",  # ships the Mistral-7B v0.1 tokenizer; pins numpy<2.4
    "numpy<2.4",
    # No `safetensors`: jaxstar.model.hf_io reads and writes the format itself (see its
    # docstring). No `chex`: only the tests use it (assert_max_traces), from the test extra.
    "tqdm",
    "tensorboardX",
    "absl-py",
]

EXTRAS_REQUIRE = {
    # Parity tests against Hugging Face transformers need torch; 2.13.0 is the CPU wheel.
    # safetensors: the tests write reference checkpoints with transformers' own writer.
    "test": [
        "pytest",
        "chex",
        "torch==2.13.0",
        "transformers",
        "safetensors",
        "nbclient",     # tests execute the colab/ notebooks
        "ipykernel",
        "matplotlib",
        "lm_eval==0.4.13",  # tests/lm_eval_adapter_test.py (skipped without it)
    ],
    "torch": ["torch==2.13.0", "transformers", "safetensors"],
    "colab": ["ipykernel", "nbclient", "matplotlib"],
    "hf": ["datasets"],
    # lm-evaluation-harness drives a jaxstar model through jaxstar.evals.lm_eval_adapter.
    # 0.4.13 installs beside torch==2.13.0 and numpy<2.4 without changing either.
    "lm-eval": ["lm_eval==0.4.13"],
}

setuptools.setup(
    name="jaxstar",
    version="0.1.0",
    description="STaR and Quiet-STaR (self-taught reasoning) in JAX/Flax",
    packages=setuptools.find_packages(include=["jaxstar", "jaxstar.*"]),
    package_data={"jaxstar.data": ["prompts/*/*.txt", "prompts/*.md"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
