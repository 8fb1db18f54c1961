"""GET /v1/models and GET /v1/models/{model}: the one model this server serves."""

from __future__ import annotations

from fastapi import APIRouter, Request

from lkserve.gateway.errors import NOT_FOUND, APIError
from lkserve.gateway.generation import served_model_name
from lkserve.gateway.protocol import ModelCard, ModelList
from lkserve.gateway.serving import ERROR_RESPONSES

router = APIRouter()


def _card(state) -> ModelCard:
    engine = state.engine
    return ModelCard(id=served_model_name(state), created=int(state.started_at), root=engine.model_id,
                     max_model_len=engine.max_model_len)


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_card(request.app.state.gw)])


@router.get("/v1/models/{model:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
async def get_model(model: str, request: Request) -> ModelCard:
    state = request.app.state.gw
    card = _card(state)
    if model not in (card.id, state.engine.model_id):
        raise APIError(404, f"The model `{model}` does not exist.", type=NOT_FOUND, param="model",
                       code="model_not_found")
    return card
