"""An example service: FastAPI takes events, a taskiq worker COPYs them in batches.

- `app.api`: the HTTP API (``POST /events``), which sends one task per event;
- `app.broker`: the taskiq broker (a Redis stream) with taskiq-fastapi wired in;
- `app.tasks`: the batch task that writes each batch into PostgreSQL;
- `app.store`: the PostgreSQL side (an asyncpg pool, tables, ``COPY``);
- `app.models`: the event as the API takes it and as the task stores it;
- `app.settings`: everything configurable, from the environment.
"""
