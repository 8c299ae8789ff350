"""Search endpoints (REST under /api/searches/) and the live search socket (/ws/searches/<id>/)."""

from __future__ import annotations

from channels.db import database_sync_to_async
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404

from webapp.studio import search as searches
from webapp.studio.auth import api_view, json_body
from webapp.studio.consumers import ExperimentConsumer
from webapp.studio.search_models import Search


@api_view(["GET", "POST"])
def search_list(request: HttpRequest) -> HttpResponse:
    if request.method == "POST":
        search = searches.create_search(request.user, json_body(request))
        return JsonResponse({"id": search.pk, "status": search.status}, status=201)
    rows = (
        Search.objects.filter(owner=request.user)
        .select_related("dataset", "teacher")
        .prefetch_related("trial_rows")[:200]
    )  # each entry carries its best trial's figures: the trials come in one query, not one per search
    return JsonResponse({"searches": [searches.search_json(s) for s in rows]})


def _own(request: HttpRequest, pk: int) -> Search:
    # Another user's search and a missing one look the same: 404.
    return get_object_or_404(Search.objects.select_related("dataset", "teacher"), pk=pk, owner=request.user)


@api_view(["GET"])
def search_detail(request: HttpRequest, pk: int) -> HttpResponse:
    return JsonResponse(searches.search_json(_own(request, pk), detail=True))


@api_view(["POST"])
def search_cancel(request: HttpRequest, pk: int) -> HttpResponse:
    search = searches.cancel_search(_own(request, pk))
    return JsonResponse(searches.search_json(search))


@database_sync_to_async
def _owns(user, search_id: int) -> bool:
    return Search.objects.filter(pk=search_id, owner=user).exists()


class SearchConsumer(ExperimentConsumer):
    """Forwards `search.message` events of group `search-<id>` to the owner's browser (trial and status)."""

    async def connect(self) -> None:
        user = self.scope.get("user")
        search_id = int(self.scope["url_route"]["kwargs"]["search_id"])
        if user is None or not user.is_authenticated:
            await self._refuse(4403)
            return
        if not await _owns(user, search_id):
            await self._refuse(4404)
            return
        self.group = searches.group_name(search_id)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()

    async def search_message(self, event: dict) -> None:
        await self.send_json(event["message"])
