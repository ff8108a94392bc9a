"""The dispatcher's loop and its parts: admission (what goes where, when), outcomes (what a call's end means),
membership (engines in and out), the monitor (the control loop on measurements) and the supervisor of helpers."""
