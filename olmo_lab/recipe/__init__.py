"""The lab recipe: training, the FlexOlmo merge in miniature, and the lab models it ships."""
