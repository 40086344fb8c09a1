"""Small in-memory samples (index, PIL image, task) for extractor tests."""
import numpy as np
from PIL import Image

# A normal task, a one-character one, an empty one (a third of the real tasks are empty).
TASKS = ["put the spoon on the towel", "x", "", "open the drawer"]


def random_samples(n=len(TASKS), seed=0, size=(40, 48)):
    """Random-pixel RGB images of `size` (width, height) with the tasks above."""
    rng = np.random.default_rng(seed)
    width, height = size
    return [(i, Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)),
             TASKS[i]) for i in range(n)]
