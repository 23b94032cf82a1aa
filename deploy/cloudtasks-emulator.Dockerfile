# gcloud-tasks-emulator pins protobuf<5, so it gets an image of its own.
FROM python:3.11-slim
RUN pip install --no-cache-dir gcloud-tasks-emulator
EXPOSE 8123
ENTRYPOINT ["gcloud-tasks-emulator", "start", "--port=8123"]
