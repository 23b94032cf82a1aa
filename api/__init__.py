"""The Starlette app: public REST API, Cloud Tasks worker endpoint, push endpoints, health."""
