"""`manage.py issue_token USERNAME [--create]`: print a new API token for a user."""

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from webapp.studio.models import ApiToken


class Command(BaseCommand):
    help = "Print a new API token for USERNAME (send it as 'Authorization: Token <key>')."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument(
            "--create", action="store_true", help="create the user (with an unusable password) if missing"
        )
        parser.add_argument("--name", default="", help="a label to tell tokens apart")

    def handle(self, *args, username: str, create: bool, name: str, **options):
        User = get_user_model()
        user = User.objects.filter(username=username).first()
        if user is None:
            if not create:
                raise CommandError(f"no user {username!r}; pass --create to create it")
            user = User(username=username)
            user.set_unusable_password()  # a script user logs in by token only
            user.full_clean(exclude=["password"])
            user.save()
            self.stderr.write(f"created user {username!r}")
        if not user.is_active:
            raise CommandError(f"user {username!r} is inactive")
        _, key = ApiToken.issue(user, name=name)
        # Only the key on stdout, so `TOKEN=$(python manage.py issue_token me)` works.
        self.stdout.write(key)
