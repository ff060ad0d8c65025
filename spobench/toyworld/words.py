"""The tiny world's vocabulary. The tiny backbone's tokenizer has one token per word here (plus a
byte-level fallback for anything else), so prompts of the grammar stay short."""

COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "cyan")
SHAPES = ("circle", "square", "triangle", "circles", "squares", "triangles")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
RELATIONS = ("above", "below", "next", "to", "of", "the", "on", "in", "and")
COUNTS = ("a", "an", "one", "two", "three")
EXTRA = ("image", "photo", "picture", "with", "background", "drawing", "beautiful", "ugly", "blurry", "sharp",
         "clean", "noisy", "high", "low", "quality", "black", "gray")

WORDS = tuple(dict.fromkeys(COLORS + SHAPES + SIZES + POSITIONS + RELATIONS + COUNTS + EXTRA))
