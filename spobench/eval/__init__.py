"""Generation, scoring, comparison and reports."""
