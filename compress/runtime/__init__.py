"""Running an artifact where a user would: CPU kernels for our quantized linears (`kernels`),
the runtime that opens an artifact by its format (`registry`), and generation (`generate`)."""
