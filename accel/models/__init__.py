"""The built-in models: their table (`registry`), shared component builders (`components`), the random-weight
models (`tiny`), the trained reference model with its weights (`shapes_flux`, `weights/`), and what every pipeline
gets before use (`pipelines`: the model's call defaults, own memory, eval mode)."""
