"""Mapping models φ(x) → φ(m(x)) between feature maps: architectures (`models`), losses
(`losses`), closed-form fits from streamed statistics (`closed_form`), and their Ray Train /
Tune wiring (`train`, `sweep`, `data`)."""
