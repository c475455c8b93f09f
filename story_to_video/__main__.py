from story_to_video.cli import main

main()
