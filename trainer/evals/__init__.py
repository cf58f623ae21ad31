"""Evaluation of frozen Toto models: probes, label propagation (J&F), loss by position, scaling fits.

Modules
- probes:        attention / average / linear-on-concatenation heads trained on frozen features
- features:      hidden states after chosen blocks at the visual-token positions
- sweep:         a probe per layer, accuracy by relative depth (JSON + PNG)
- propagation:   Jabri et al. label propagation over per-patch features
- jf, davis:     DAVIS-2017 reading and J / F / J&F scoring
- position_loss: next-token loss by position and frame within a clip
- scaling:       L(C) = a·C^b on the compute-optimal frontier
- data_checks:   what a token dataset carries before training (bag-of-tokens baseline, predictability)
- report:        markdown reports with plots, our numbers beside the paper's (paper.py); paired s.e.
"""
