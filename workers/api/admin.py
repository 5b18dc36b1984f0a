"""Flows administration: create, pause, resume (scope admin)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from workers.api.auth import API_KEY_HEADER, BEARER

router = APIRouter(dependencies=[Depends(BEARER), Depends(API_KEY_HEADER)])
