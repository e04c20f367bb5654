"""Routers, one interface (:mod:`mllmcl.routing.base`), one registry by kind:
``mllm`` (MR-LoRA's MLLM router) and ``text_prototype`` (a training-free selector)."""

from mllmcl.routing.base import (FALLBACK_RULES, Route, Router, fallback_index, get_router, load_router,
                                 register_router, registered_routers)

__all__ = ["FALLBACK_RULES", "Route", "Router", "fallback_index", "get_router", "load_router", "register_router",
           "registered_routers"]
