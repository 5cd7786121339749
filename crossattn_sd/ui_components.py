"""Gradio components as the web UI uses them: number inputs whose errors name the input (no state, no handlers).

Shared by `ui.py` and its tab modules (`ui_inspect.py`).
"""

# No `from __future__ import annotations`: Gradio reads handlers' annotations unevaluated (see ui.py).
import gradio as gr


def _naming_range_errors(component: gr.components.Component) -> gr.components.Component:
    """`component`, whose out-of-range error names the input: Gradio's own check says only "Value 0 is less than
    minimum value 1", and a value that is not a number ("abc", NaN) would be a generic error. Wraps the
    instance's `preprocess` (Gradio calls it on the instance): a subclass would make Gradio's component
    metaclass write a `ui.pyi` stub next to this module at import."""
    preprocess = component.preprocess

    def named(payload):
        try:
            return preprocess(payload)
        except gr.Error as err:
            raise gr.Error(f"{component.label}: {err.message}", print_exception=False) from None
        except (ValueError, TypeError, OverflowError):
            raise gr.Error(f"{component.label}: {str(payload)[:40]!r} is not a number", print_exception=False) \
                from None

    component.preprocess = named
    return component


def Slider(*args, **kwargs) -> gr.Slider:  # noqa: N802 (stands in for the component class)
    return _naming_range_errors(gr.Slider(*args, **kwargs))


def Number(*args, **kwargs) -> gr.Number:  # noqa: N802
    return _naming_range_errors(gr.Number(*args, **kwargs))
