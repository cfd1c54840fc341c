"""Methods that shrink attention's KV cache: fewer KV heads (``kvheads``, math in ``align``)."""
