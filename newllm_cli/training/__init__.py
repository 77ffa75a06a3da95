"""Learning: Phase 1 (CVFP), its optimizer, the convex head fit and Phase 2 pairs."""
