"""The model families lmforge loads, as data: how each Hugging Face config.json maps onto ModelConfig's fields and
back, which of its keys are read, and which are known not to change the computation.

A family is one `FamilySpec` (decoders.py, encoders.py) plus a tensor-name table (checkpoints/hf.py), never a
model class of its own. A config.json key that is neither read nor known to be inert, and holds a value other than
null / false / 0, is refused with its name: a field that changes the computation is implemented or refused, never
dropped. Builders return ModelConfig keyword arguments (this package does not import config.py, which imports it).
"""

from types import MappingProxyType

from lmforge.families.decoders import DECODERS
from lmforge.families.encoders import ENCODERS
from lmforge.families.spec import COMMON_INERT, FamilySpec

SPECS: tuple[FamilySpec, ...] = DECODERS + ENCODERS
BY_NAME = MappingProxyType({s.name: s for s in SPECS})
BY_HF_TYPE = MappingProxyType({t: s for s in SPECS for t in s.hf_types})

__all__ = ["BY_HF_TYPE", "BY_NAME", "COMMON_INERT", "SPECS", "FamilySpec"]
