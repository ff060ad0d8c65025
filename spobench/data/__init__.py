"""One loader per kind of data: prompts and prompt sets, preference pairs, images."""
