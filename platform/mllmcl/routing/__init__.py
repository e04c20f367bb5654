"""Routers, one interface (:mod:`mllmcl.routing.base`), one registry by kind: ``mllm`` (MR-LoRA's
MLLM router), ``text_prototype`` (DISCO-style text prototypes), ``mm_prototype`` (training-free
multimodal prototypes), ``ridge`` (a closed-form ridge classifier) and ``oracle`` (the bound)."""

from mllmcl.routing.base import (FALLBACK_RULES, Route, Router, fallback_index, get_router, load_router,
                                 register_router, registered_routers)

__all__ = ["FALLBACK_RULES", "Route", "Router", "fallback_index", "get_router", "load_router", "register_router",
           "registered_routers"]
