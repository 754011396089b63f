"""Presets shipped with radpretrain: one YAML file per method and budget (see radpretrain.config)."""
