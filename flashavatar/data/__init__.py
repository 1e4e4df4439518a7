"""Dataset readers for the FlashAvatar / metrical-tracker layout (SPEC §1)."""

from .dataset import (BACKGROUNDS, AdjacentPairs, FlashAvatarDataset, collate_frames, collate_pairs,  # noqa: F401
                      compose_gt, read_image)
from .tracker import TrackerFrame, list_tracker_frames, load_tracker_frame  # noqa: F401
