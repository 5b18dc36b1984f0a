"""Money-moving requests: top-ups with an Idempotency-Key, auto-reload settings (scope billing)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from workers.api.auth import API_KEY_HEADER, BEARER

router = APIRouter(dependencies=[Depends(BEARER), Depends(API_KEY_HEADER)])
