"""Install the toolkit.

GPU users install Paddle's GPU wheel first and then ``pip install .``; the CPU wheel is only pulled
by the ``cpu`` extra (``pip install .[cpu]``) so that two Paddle builds never share one environment.
"""

from setuptools import Extension, find_packages, setup

# The toolkit's CPU kernels (RMSNorm, rotary, SwiGLU; ppo/models/cpu_kernels.py), loaded with ctypes.
# Optional: where no C compiler is found the install goes on and the toolkit runs paddle's kernels.
CPU_KERNELS = Extension(
    "ppo.models._cpu_kernels",
    sources=["ppo/models/_cpu_kernels.c"],
    extra_compile_args=["-O3", "-ffp-contract=off", "-fno-trapping-math", "-std=c99"],
    optional=True,
)

setup(
    name="paddle-rlhf",
    version="0.1.0",
    description="PaddlePaddle-native RLHF: supervised fine-tuning, reward modelling and PPO with 3D parallelism",
    packages=find_packages(include=["ppo", "ppo.*", "rm", "rm.*", "dpo", "dpo.*"]),
    package_data={"ppo.tiny": ["data/*.jsonl", "data/arithmetic/*.jsonl"]},
    ext_modules=[CPU_KERNELS],
    python_requires=">=3.9",
    install_requires=[
        "paddlenlp==3.0.0b4",
        "numpy<2",
        "datasets>=2.19",
        "sentencepiece",
        # checkpoint manifests: CRC-32C of every file (hardware-accelerated; see README)
        "crc32c",
        "tqdm",
        # the chat templates (ppo/data/chat.py) and fast tokenizers from tokenizer.json
        "Jinja2",
        "tokenizers",
        # every weights file the toolkit writes or converts, read lazily (ppo/storage/tensors.py)
        "safetensors",
        # paddlenlp imports aistudio_sdk.hub.download, removed in aistudio-sdk 0.3
        "aistudio-sdk<0.3",
    ],
    extras_require={
        "cpu": ["paddlepaddle>=3.0,<3.4"],
        # the suite runs on every core (scripts/test.sh); transformers (on torch's CPU build) is the
        # reference the model-family tests compare against, run in its own process (tests/hf_reference.py)
        "test": ["pytest", "pytest-xdist", "torch", "transformers"],
        "plot": ["matplotlib"],
    },
)
