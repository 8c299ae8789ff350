"""Browser pages: thin views that render templates; the pages' JavaScript talks to the JSON API."""

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render

from webapp.studio.models import Experiment


def home(request: HttpRequest) -> HttpResponse:
    if not request.user.is_authenticated:
        return redirect("/login/")
    return experiments(request)


@login_required
def datasets(request: HttpRequest) -> HttpResponse:
    return render(request, "datasets.html", {"nav": "datasets"})


@login_required
def teachers(request: HttpRequest) -> HttpResponse:
    return render(request, "teachers.html", {"nav": "teachers"})


@login_required
def experiments(request: HttpRequest) -> HttpResponse:
    return render(request, "experiments.html", {"nav": "experiments"})


@login_required
def new_experiment(request: HttpRequest) -> HttpResponse:
    return render(request, "experiment_new.html", {"nav": "new"})


@login_required
def experiment_detail(request: HttpRequest, pk: int) -> HttpResponse:
    # Another user's experiment and a missing one look the same, as in the API.
    get_object_or_404(Experiment.objects.only("pk"), pk=pk, owner=request.user)
    return render(request, "experiment_detail.html", {"nav": "experiments", "experiment_id": pk})


@login_required
def searches(request: HttpRequest) -> HttpResponse:
    return render(request, "searches.html", {"nav": "searches"})


@login_required
def new_search(request: HttpRequest) -> HttpResponse:
    return render(request, "search_new.html", {"nav": "searches"})


@login_required
def search_detail(request: HttpRequest, pk: int) -> HttpResponse:
    from webapp.studio.search_models import Search

    get_object_or_404(Search.objects.only("pk"), pk=pk, owner=request.user)
    return render(request, "search_detail.html", {"nav": "searches", "search_id": pk})


@login_required
def compare(request: HttpRequest) -> HttpResponse:
    return render(request, "compare.html", {"nav": "compare"})
