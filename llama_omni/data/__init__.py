"""InstructS2S data construction: text sources -> rewriting -> responses -> speech -> units."""
