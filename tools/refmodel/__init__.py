"""Training and evaluation of shapes-flux, the reference model: the data generator (`data`), `train` and
`evaluate`. The model itself is `accel.models.shapes_flux`; its scorer and caption grammar are in `accel.eval`."""
