"""Integrations with other libraries; each module imports its library (tg_kernels itself never does)."""
