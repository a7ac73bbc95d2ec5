from setuptools import setup

setup(
    name="llm2vec-fast",
    version="0.1.0",
    packages=["llm2vec_fast", "llm2vec_fast.kernels"],
    package_dir={"llm2vec_fast": "llm2vec_fast", "llm2vec_fast.kernels": "kernels"},
)
