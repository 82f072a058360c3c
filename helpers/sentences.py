"""The course's one way of writing a measurement in a sentence, for every place that prints one: the notebooks, the
runner's console lines, the records' summaries and the appendices. No torch: the runner's own process prints them."""


def measurement_sentence(median_s, iqr_s, runs=None, device=None, first_call_s=None, per=None, note=None):
    """The one way the course writes a measurement: '0.084 s median (IQR 0.002 s, 5 runs) on DEVICE; first call
    12.30 s', each part only where given; `per` ("image", "call") names what a median's seconds are for, `note`
    joins the parenthesis."""
    text = f"{median_s:.3f} s per {per}" if per else f"{median_s:.3f} s median"
    text += f" (IQR {iqr_s:.3f} s" + (f", {runs} runs" if runs else "") + (f", {note}" if note else "") + ")"
    if device:
        text += f" on {device}"
    if first_call_s is not None:
        text += f"; first call {first_call_s:.2f} s"
    return text


def noisy_sentence(median_s, iqr_s):
    """What a measurement whose spread is too wide to trust says about itself."""
    return (f"Noisy: the IQR is {100 * iqr_s / median_s:.0f}% of the median; did something else use the machine? "
            "Measure again.")
