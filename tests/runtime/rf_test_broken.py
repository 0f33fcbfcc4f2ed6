"""A handler module whose import fails (the runtime tests expect HandlerImportError naming it)."""
import rayfleet_no_such_dependency  # noqa: F401


def handler(request):
    return "unreachable"
