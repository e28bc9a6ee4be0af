"""Text that exists wherever Python does: CPython's own documentation (pydoc_data.topics), the corpus the
bundled demo model was trained on, split into train and held-out topics; also read by calibrated quantisation
(airmlx/calibrate.py)."""
import re

HELD_OUT_EVERY = 20


def normalise(text):
    text = "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").splitlines())
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def corpus():
    """(train texts, held-out texts): every 20th topic, sorted by name, is held out."""
    import pydoc_data.topics
    keys = sorted(pydoc_data.topics.topics)
    held = set(keys[::HELD_OUT_EVERY])
    texts = {k: normalise(pydoc_data.topics.topics[k]) for k in keys}
    return [texts[k] for k in keys if k not in held], [texts[k] for k in keys if k in held]
