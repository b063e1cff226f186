"""What a job is told: settings (pydantic, one model per job, documented per field), YAML loading with
overrides whose errors name the key, and model profiles (everything model-specific, from configs/).

May import: densify.io (for nothing but names), pydantic, yaml. Never the engines, stages or commands
(engine and densifier options are validated through their own registries, imported when a config loads).
"""
