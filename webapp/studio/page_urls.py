"""URL patterns of the browser pages (included at "" by webapp/urls.py)."""

from django.contrib.auth import views as auth_views
from django.urls import path

from webapp.studio import pages

urlpatterns = [
    path("", pages.home, name="home"),
    path("login/", auth_views.LoginView.as_view(template_name="login.html"), name="login"),
    path("logout/", auth_views.LogoutView.as_view(next_page="/login/"), name="logout"),
    path("datasets/", pages.datasets, name="datasets"),
    path("teachers/", pages.teachers, name="teachers"),
    path("experiments/", pages.experiments, name="experiments"),
    path("experiments/new/", pages.new_experiment, name="experiment-new"),
    path("experiments/<int:pk>/", pages.experiment_detail, name="experiment-detail"),
    path("compare/", pages.compare, name="compare"),
    path("searches/", pages.searches, name="searches"),
    path("searches/new/", pages.new_search, name="search-new"),
    path("searches/<int:pk>/", pages.search_detail, name="search-detail"),
]
