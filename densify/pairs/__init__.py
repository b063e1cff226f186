"""Image pairs: which pairs to relate (select), correspondence answers -> matches and dense flow
(matching), matches + depth -> a relative pose with its verdict (solve), and poses asked directly of a
pose profile (vlm_pose).

May import: densify.queries, densify.fields, densify.geometry, densify.io, densify.config, densify.engines.base.
"""
