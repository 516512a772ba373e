"""Data: slides -> tile stores -> bags of tiles, with layouts, a generated PANDA-like set and augmentation.

Pipeline: a layout (`layouts.panda_layout`, ...) lists slides; `tiling.tile_dataset` writes their
foreground tiles into a tensorstore store plus a manifest; `store.TileStore` reads tiles;
`bags.train_bags` / `bags.eval_bags` / `bags.eval_draws` feed training and evaluation;
`augment` transforms a whole bag with one random draw.
"""
