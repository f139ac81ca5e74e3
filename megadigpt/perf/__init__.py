"""How fast and how big, measured: ``memory`` (``megadigpt plan``: per-GPU memory from ZeRO's model states and
activations traced on the meta device) and ``bench`` (``megadigpt bench``: images/s, step-time breakdown, peak
memory and MFU over a grid of configurations, beside a reference-style baseline)."""
